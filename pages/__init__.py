"""SFT Studio's pages. Listed in app.py with st.navigation; `common` holds the shared app-side helpers."""
