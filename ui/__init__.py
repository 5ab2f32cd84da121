"""The app's small helper package (not pages: Streamlit would list them as pages).

- ``state``: folders, session-state keys with their defaults, ``start_widget``
- ``nav``: the one Streamlit-internals workaround
- ``loaders``: cached tokenizer, datasets, batches, models, machine and judge status, runs
- ``figures``: Plotly figures and formatters
"""
