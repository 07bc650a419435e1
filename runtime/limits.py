"""Limits that more than one service enforces, each defined here once.

The app builder (`deploy/app.py`) takes one value of each and hands it to every
service that checks it, so the router and the encoder cannot disagree.
"""

MAX_IMAGE_BYTES = 20 * 2**20  # encoded bytes of one image: the router's fetch cap, the encoder's check
# Raster formats a client may send (PIL format names, as OpenAI accepts): only these PIL
# plugins ever parse client bytes, in the encoder and in the router's size reading.
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
