"""The data stage: raw datasets -> deterministic WebDataset shards (prepare.py) and what training and evaluation read
back from them (loader.py, batches.py). Its outputs live beside it in ignored folders: shards/, refstats/, raw/."""
