"""Weights: finding, reading, converting and quantizing checkpoints.

  hub.py         the weights, Mimi and the tokenizer: local files or the Hugging Face Hub
  checkpoint.py  safetensors files, with errors a person can act on
  layouts.py     the tensor layouts of released checkpoints -> this project's names
  quantize.py    which weights are quantized, and at how many bits
  loading.py     `moshivis_mlx.load`: a checkpoint -> a ready `MoshiVis`
  convert/       `python -m moshivis_mlx convert`: any released checkpoint -> one of ours, quantized or not
"""
