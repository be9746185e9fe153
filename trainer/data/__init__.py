"""Data: text and token sources, tokenizers, conversion to shards, the shard format and the
batch streams a run reads, and the reader that fetches the next batch ahead.
"""
