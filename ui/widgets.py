"""Widgets drawn from a settings dataclass's fields: their help, range, choices and defaults.

``setting_input`` puts one ``TrainConfig`` field on the page: a checkbox for a bool, a select box
where the field has choices (from the engine's registries), a number input with the field's
range otherwise. Optional numbers (``max_steps``, ``limit``) show 0 for "none". The value starts
from ``defaults`` (a config: the chapter's, or a model preset's) and lives in session state, so
a callback can change it (``reset_settings``) and it survives navigation.
"""
from dataclasses import fields

import streamlit as st

from sft.studio.config import TrainConfig, choices_of, field_type

from .state import start_widget

FIELDS = {f.name: f for f in fields(TrainConfig)}


def _widget_value(name, default):
    kind, optional = field_type(FIELDS[name])
    return 0 if optional and default is None and kind in (int, float) else default


def setting_input(container, name, label, *, key, defaults, toggle=False, fmt=None, **kwargs):
    """Draw field ``name`` of ``TrainConfig`` in ``container``; returns its value (None for 0 where optional)."""
    f = FIELDS[name]
    kind, optional = field_type(f)
    meta = f.metadata
    kwargs.setdefault("help", meta["help"][:1].upper() + meta["help"][1:] + ".")
    start_widget(key, _widget_value(name, getattr(defaults, name)), choices_of(f))
    if kind is bool:
        return (container.toggle if toggle else container.checkbox)(label, key=key, **kwargs)
    choices = choices_of(f)
    if choices is not None:
        return container.selectbox(label, list(choices), key=key, **kwargs)
    if kind in (int, float):
        low, high = meta.get("low"), meta.get("high")
        if optional:
            low = 0  # 0 = none
        value = container.number_input(label, min_value=kind(low) if low is not None else None,
                                       max_value=kind(high) if high is not None else None, key=key,
                                       format=fmt, **kwargs)
        return None if optional and not value else kind(value)
    return container.text_input(label, key=key, **kwargs)


def reset_settings(keys_by_field, defaults):
    """Put each widget ``key`` back to ``defaults``' value of its field (e.g. when the model changes)."""
    for name, key in keys_by_field.items():
        st.session_state[key] = _widget_value(name, getattr(defaults, name))


def presenting_toggle():
    """The sidebar's "Presenting (projector)" toggle, drawn by app.py above every page; its value is a plain
    key kept in the workspace, so other pages and a reload find it. On, it widens the page's main column."""
    ss = st.session_state
    ss["side_presenting"] = bool(ss.get("presenting"))  # the plain key decides; a click changes it first

    def keep():
        from .state import remember

        remember(presenting=bool(ss.side_presenting))

    on = st.sidebar.toggle("Presenting (projector)", key="side_presenting", on_change=keep,
                           help="For a projector at 1280x720: larger batch grids, token views and legends; the "
                                "-100 cells and the end-of-text target stay on screen without scrolling sideways.")
    if on:  # the page's side margins go to the grids
        st.html("<style>[data-testid=stMainBlockContainer]{padding-left:1.5rem;padding-right:1.5rem;"
                "max-width:none}</style>")
    return on


def code_behind(snippet, *, note=None):
    """An expander with the ``sft`` Python (and the ``python -m sft`` command, where there is one) that redoes
    what the page shows with its current settings; ``snippet`` is a ``ui.snippets`` (code, command) pair."""
    code, cli = snippet
    with st.expander("The code behind this page", icon=":material/code:"):
        st.caption(note or "These lines redo what this page shows, with its current settings, in Python "
                   "(a notebook, a script).")
        st.code(code, language="python")
        if cli:
            st.caption("The same from a terminal:")
            st.code(cli, language="bash")
