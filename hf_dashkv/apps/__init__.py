"""The applications built on the library: the ``dashkv`` command (``cli``), its passkey demo, the speed benchmark,
the offline evaluation and its corpora, embedded-model loading, and the ``lightning`` training command.

None of this is imported by ``import hf_dashkv``, which loads only what decoding needs.
"""
