"""A conversation at run time: 80 ms frames of the user's voice in, the model's voice and text out.

  pipeline.py      three stages on three threads, side by side: Mimi encoder, model step, Mimi decoder
  conversation.py  `Conversation`: the API over them, which the applications use and apps embed
  offline.py       file mode: a recorded question in, the spoken answer out, as fast as the machine goes
"""
