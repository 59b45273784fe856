"""The extraction job, one module per stage in the order the data takes:

============  ==========================================================================================
``read``      the note table read and checked: valid notes and rejected rows with their reasons
``plan``      each task against its ledger: every note's action, the selection, deletes, the watermark
``rounds``    the selection cut into rounds, each extracted and committed before the next
``stage``     the executors' side (``mapInArrow``): Arrow batches -> engines -> parsed, grounded rows
``staging``   files staged before a commit, named per Spark task attempt (exactly one copy read back)
``commit``    the Delta writes of a round, of rejections, deletes and refreshes; the ledger-row builder
``publish``   after the rounds: the concepts linked to the OMOP vocabulary and published as OMOP tables
``report``    run records (the ``runs`` table), counts, progress lines, the dry-run report, the exit code
``identity``  the model and adapter a task runs on and the extraction fingerprint
``session``   the Spark session and the log levels (``log4j2.properties``)
``job``       one pass: :func:`job.run`
``cli``       flags, settings overrides, exit codes: :func:`cli.main`
============  ==========================================================================================

``spark-submit jobs/extract.py`` (a thin entry) runs :func:`cli.main`. A pass over several tasks reads the input
once, plans each task against its own ledger and sends every task's prompts through the same engines in shared
rounds; rows, ledger rows and run records stay per task (run id ``<pass id>-<task>``).

Note text never passes through the Spark driver; logs carry ids, counts and rates only (an unexpected failure is
logged as its type and code location, not its message, unless ``job.log_phi``). Everything written is confined to
``--output`` (``job.output_root``), created under ``job.umask`` (077) and done under an exclusive run lock on
``--output``.
"""
