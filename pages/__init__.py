"""SFT Studio's pages, listed in app.py with st.navigation. Their shared helpers are the `ui` package."""
