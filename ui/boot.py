"""What a cold server's first visitor sees while PyTorch loads (about two seconds on a small CPU).

Imported first, before anything that imports torch: on the first run after the server starts it puts
a line at the top of the page, which ``done()`` (or the next rerun) clears. Later runs find torch
loaded and draw nothing.
"""
import sys

import streamlit as st

_note = None
if "torch" not in sys.modules:
    _note = st.empty()
    _note.caption(":material/hourglass_top: Starting SFT Studio: loading PyTorch (only after the server starts)…")


def done():
    """Clear the starting line once the page's imports are in."""
    if _note is not None:
        _note.empty()
