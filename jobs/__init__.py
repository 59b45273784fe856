"""spark-submit entry points: extract (the nightly job), train, evaluate."""
