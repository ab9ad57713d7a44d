"""The model: MoshiVis as the official implementation computes it, written as a GPU runs it.

  config.py     every size, as dataclasses
  layers.py     the building blocks of the temporal transformer and the depformer
  temporal.py   the temporal transformer, the image reaching it through a gated cross-attention
  depformer.py  the depth transformer: a frame's 8 audio codebooks, one after the other
  siglip.py     the SigLIP vision tower
  image.py      pictures as users have them -> SigLIP's input (bicubic.py: PyTorch's resampling weights)
  model.py      `MoshiVis`: the parts together; a picture -> its image K/V
  stream.py     frame-by-frame generation with Moshi's token delays: one compiled step per frame
  sampling.py   token sampling
  text.py       the text stream as readable text

Their CPU counterparts are in `moshivis_mlx.cpu`.
"""
