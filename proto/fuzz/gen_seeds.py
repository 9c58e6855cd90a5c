#!/usr/bin/env python3
"""Writes the hand-made seed inputs under seeds/<target>/. Run from proto/fuzz: python3 gen_seeds.py

Seeds are small, mostly valid inputs, so the fuzzer starts past each decoder's early checks.
Chunk ids in the manifests are arbitrary 32-byte strings (SHA-256 here; the decoder does not
care which hash made them). Re-running rewrites the same files byte for byte.
"""
import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
KIB = 1024
MIB = 1024 * KIB


def write(target, name, data):
    path = os.path.join(HERE, "seeds", target, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(path, "wb") as f:
        f.write(data)


def manifest(length, chunk_bytes, count=None):
    if count is None:
        count = -(-length // chunk_bytes)
    header = b"CMMF" + bytes([1, 0, 0, 0]) + struct.pack("<IQI", chunk_bytes, length, count)
    ids = b"".join(hashlib.sha256(struct.pack("<QI", length, i)).digest() for i in range(count))
    return header + ids


# manifest_decode: valid encodings (decode Ok), plus one header claiming far more ids than given.
write("manifest_decode", "empty_object", manifest(0, 4 * MIB))
write("manifest_decode", "one_chunk_10_bytes", manifest(10, 4 * MIB))
write("manifest_decode", "min_chunks_partial_last", manifest(3 * 64 * KIB + 1, 64 * KIB))
write("manifest_decode", "exact_multiple_128k", manifest(2 * 128 * KIB, 128 * KIB))
write("manifest_decode", "truncated_huge_count", manifest(1024 * 1024 * MIB, 4 * MIB, 0)[:20]
      + struct.pack("<I", 262144))

# id_parse: canonical ids, plus near misses (uppercase, short, multibyte).
write("id_parse", "blake3_abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85")
write("id_parse", "zeros", "0" * 64)
write("id_parse", "all_digits", "0123456789abcdef" * 4)
write("id_parse", "uppercase", "0123456789ABCDEF" * 4)
write("id_parse", "short", "f" * 63)
write("id_parse", "multibyte_tail", "0" * 62 + "\u00e9")

# range_parse: 8-byte little-endian object length, then the Range header value.
def rng(length, value):
    return struct.pack("<Q", length) + value.encode()


write("range_parse", "first_last", rng(10_000, "bytes=0-499"))
write("range_parse", "middle", rng(10_000, "bytes=500-999"))
write("range_parse", "suffix", rng(10_000, "bytes=-500"))
write("range_parse", "open_end", rng(10_000, "bytes=9500-"))
write("range_parse", "past_end", rng(10, "bytes=0-99999"))
write("range_parse", "suffix_longer_than_object", rng(10, "bytes=-99999"))
write("range_parse", "empty_object", rng(0, "bytes=0-0"))
write("range_parse", "max_length", rng(2**64 - 1, "bytes=18446744073709551614-18446744073709551615"))
write("range_parse", "whitespace", rng(100, " bytes= 1-2 "))
write("range_parse", "multiple", rng(100, "bytes=0-1,4-5"))

# api_json: one valid body of each answer type.
OBJECT_ID = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
write("api_json", "error_body", json.dumps(
    {"error": {"code": "range_not_satisfiable", "message": "range does not overlap an object of 10 bytes"}}))
write("api_json", "error_body_escapes", '{"error":{"message":"bad \\"id\\" \\u00e9\\ud83d\\ude00","code":"bad_object_id"}}')
write("api_json", "put_object_response", json.dumps(
    {"object_id": OBJECT_ID, "length": 10485760, "chunk_count": 3, "chunks_uploaded": 2}))
write("api_json", "status_response", json.dumps({
    "version": "0.1.0",
    "uptime_seconds": 3600,
    "origin": "s3://bucket/prefix",
    "store": {
        "data_dir": "/var/lib/cachemesh",
        "io_backend": "io_uring",
        "io_backend_reason": "probe succeeded",
        "verify_reads": True,
        "used_bytes": 1073741824,
        "budget_bytes": 10737418240,
        "chunk_count": 256,
        "pinned_chunk_count": 4,
        "manifest_count": 12,
        "evicted_chunks": 0,
    },
}))

# volume_record: valid records of each op, a snapshot of two entries, a head announcement
# and a path.
def vpath(text):
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def record(op, seq, body):
    return b"CMVR" + bytes([1, op, 0, 0]) + struct.pack("<QQQ", seq, 1_700_000_000_000, 42) + body


OBJECT_BYTES = bytes.fromhex(OBJECT_ID)
write("volume_record", "put", record(1, 1, vpath("models/llama/weights.bin") + OBJECT_BYTES + struct.pack("<Q", 10485760)))
write("volume_record", "rename", record(2, 2, vpath("tmp/upload") + vpath("models/final")))
write("volume_record", "delete", record(3, 3, vpath("a")))
write("volume_record", "snapshot", b"CMVS" + bytes([1, 0, 0, 0]) + struct.pack("<QI", 5, 2)
      + vpath("a/b") + OBJECT_BYTES + struct.pack("<QQQ", 3, 1_700_000_000_000, 1)
      + vpath("a/c") + OBJECT_BYTES + struct.pack("<QQQ", 0, 1_700_000_000_001, 5))
write("volume_record", "path_text", "models/llama/weights.bin")
write("volume_record", "head", b"CMVH" + bytes([1, 6]) + b"team-a" + struct.pack("<Q", 42))
