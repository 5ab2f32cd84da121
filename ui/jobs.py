"""Watching a background job (``sft.studio.jobs``) on a page: "k of N", a Stop button, then the page again.

A page starts a job and calls ``watch(job, ...)`` while it is active: a fragment that reads the job's
status.json every second, redrawing only itself, so clicks elsewhere on the page (or a reload, or
another page) never touch the job. When the job has ended it reruns the whole page once, which then
shows how it ended (``ended``) and the results the job saved.
"""
import streamlit as st

from sft.studio.jobs import ACTIVE_STATES, Job


def watch(job, *, key: str, counted: str):
    """Draw the active ``job``'s progress ("k of N {counted}") with a Stop button keyed ``{key}_stop``."""
    _live(str(job.path), key, counted)


@st.fragment(run_every=1.0)
def _live(folder: str, key: str, counted: str):
    job = Job(folder)
    status = job.status()
    if status.get("state") not in ACTIVE_STATES:
        st.rerun()  # the whole page: it shows how the job ended and what it saved
    row = st.columns([6, 1], vertical_alignment="center")
    if row[1].button("Stop", key=f"{key}_stop", icon=":material/stop:", disabled=bool(status.get("stop_requested")),
                     help="What is done so far is kept."):
        job.request_stop()
        status = job.status()
    done, total = status.get("done") or 0, status.get("total")
    text = f"{done} of {total} {counted}" if total else "Starting…"
    if status.get("stop_requested"):
        text = f"Stopping after the current step… {text}"
    elif status.get("message") and total:
        text += f" ({status['message']})"
    row[0].progress(min(done / total, 1.0) if total else 0.0, text=text)


def ended(status: dict, *, counted: str, saved: str, again: str):
    """How a job that is no longer active ended, in words: None for "completed" (the page says what it
    made) and before any job; stopped: an info box; failed: an error with the job's reason."""
    state, done, total = status.get("state"), status.get("done") or 0, status.get("total")
    of = f"{done} of {total}" if total is not None else str(done)
    if state == "stopped":
        st.info(f"Stopped at {of} {counted}; {saved} {again}", icon=":material/pause_circle:")
    elif state == "failed":
        st.error(f"Failed at {of} {counted}: {status.get('error')}\n\n{saved[:1].upper()}{saved[1:]} {again}",
                 icon=":material/error:")
    return state
