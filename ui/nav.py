"""A Streamlit quirk, worked around in one place."""
import streamlit as st


def leave_legacy_navigation():
    # Streamlit quirk: a server whose very first visit is a page URL (say /judge) finds a pages/ folder
    # and runs that page in the legacy multipage mode, without app.py, so the sidebar lists the files
    # of pages/ (common.py among them) for the server's whole life. app.py's st.navigation is what
    # leaves that mode; a page that finds itself in it clears the flag and reruns through app.py.
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the flag has no such mode
        return
    # Once per session: AppTest puts every run back in that mode, and a rerun there would drop a click.
    if getattr(PagesManager, "uses_pages_directory", None) and not st.session_state.get("_nav_checked"):
        st.session_state["_nav_checked"] = True
        PagesManager.uses_pages_directory = False
        st.rerun()


