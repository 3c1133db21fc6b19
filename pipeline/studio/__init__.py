"""`sketchgan studio`: draw sketches in a browser, customise, watch runs learn, compare and use the models.

A FastAPI backend (`app`) over the library's own stages; the page (`static/`) needs no build step.
"""
