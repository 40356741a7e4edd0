"""``dashkv eval``: DASH-KV against full attention and the selection baselines, on the same prompts, in one run.

- :mod:`.sample`: one prompt, its references and metric;
- :mod:`.suite`: the offline LongBench-like suite built from registry packages;
- :mod:`.longbench`: LongBench as published, from its JSONL files;
- :mod:`.metrics`: LongBench's metric definitions (and RULER's string match);
- :mod:`.runner`: every method from one shared prefill, predictions as resumable JSONL;
- :mod:`.report`: tables (markdown, CSV) and plots, each method as a ratio to full attention.
"""
