import hashlib
import re

from notelake.udfs.hashing import concept_id, fingerprint, relation_id, sha256_text

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def test_sha256_text_known_vectors():
    # the same values Spark SQL returns for sha2('abc', 256) and sha2('', 256)
    assert sha256_text("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_text("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    # UTF-8 bytes, not code points or UTF-16
    assert sha256_text("é\r\n中") == hashlib.sha256("é\r\n中".encode("utf-8")).hexdigest()


def test_sha256_text_survives_lone_surrogate():
    assert len(sha256_text("a\ud800b")) == 64


def test_concept_id_shape_and_sensitivity():
    base = ("n1", "phee", "Drug", 3, 10, "insulin", 0)
    cid = concept_id(*base)
    assert HEX32.match(cid)
    assert cid == concept_id(*base)
    for i, changed in enumerate(["n2", "maccrobat", "Treatment", 4, 11, "Insulin", 1]):
        args = list(base)
        args[i] = changed
        assert concept_id(*args) != cid
    # ungrounded rows: start/end None, ordinal keeps them apart
    assert concept_id("n1", "phee", "Drug", None, None, "x", 0) != concept_id("n1", "phee", "Drug", None, None, "x", 1)
    # None is not 0
    assert concept_id("n1", "phee", "Drug", None, None, "x", 0) != concept_id("n1", "phee", "Drug", 0, 0, "x", 0)


def test_relation_id():
    rid = relation_id("n1", "phee", "adverse_effect", "a" * 32, "b" * 32)
    assert HEX32.match(rid)
    assert rid != relation_id("n1", "phee", "adverse_effect", "b" * 32, "a" * 32)


def test_fingerprint_sorted_keys_and_sensitivity():
    fp = fingerprint("m" * 64, None, "t1-abc", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 200}, "p1", "vllm")
    assert HEX32.match(fp)
    # dict key order does not matter
    assert fp == fingerprint("m" * 64, None, "t1-abc", {"max_tokens": 384, "temperature": 0.0}, {"overlap": 200, "max_chars": 1000}, "p1", "vllm")
    variants = [
        ("x" * 64, None, "t1-abc", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 200}, "p1", "vllm"),
        ("m" * 64, "a" * 64, "t1-abc", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 200}, "p1", "vllm"),
        ("m" * 64, None, "t1-abd", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 200}, "p1", "vllm"),
        ("m" * 64, None, "t1-abc", {"temperature": 0.0, "max_tokens": 385}, {"max_chars": 1000, "overlap": 200}, "p1", "vllm"),
        ("m" * 64, None, "t1-abc", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 100}, "p1", "vllm"),
        ("m" * 64, None, "t1-abc", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 200}, "p2", "vllm"),
        ("m" * 64, None, "t1-abc", {"temperature": 0.0, "max_tokens": 384}, {"max_chars": 1000, "overlap": 200}, "p1", "replay"),
    ]
    assert len({fingerprint(*v) for v in variants} | {fp}) == len(variants) + 1
