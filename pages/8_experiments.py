"""Experiments: runs compared (curves overlaid, only the settings that differ, each run's figures), the queue."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from sft.studio.experiments import X_AXES, compare_runs
from sft.studio.queue import dequeue, ensure_runner, move, queue_table
from sft.studio.runs import RunError
from ui import experiments, loaders, state

state.init_state()
ss = st.session_state
st.title("Experiments")
st.caption("Runs side by side: their loss curves overlaid, the settings that differ between them, and what each "
           "achieved. Runs of different sizes or data can be compared; the table says what differs.")

runs = [r for r in loaders.list_runs() if not r.is_broken]
if not runs:
    st.info("No runs yet: fine-tune one on the Fine-tune page.")
    st.stop()
names = [r.name for r in runs]
state.start_widget("exp_runs", [n for n in ss.get("exp_selected", names[:3]) if n in names] or names[:3])
picked = st.multiselect("Runs", names, key="exp_runs")
ss.exp_selected = picked
by_name = {r.name: r for r in runs}
chosen = [by_name[n] for n in picked]  # in the order picked
if chosen:
    x = st.radio("x axis", list(X_AXES), horizontal=True, key="exp_x")
    st.plotly_chart(experiments.curves_figure(chosen, x), key="exp_curves")
    table = compare_runs(chosen)
    st.subheader("What each run achieved")
    st.dataframe(experiments.results_frame(table["rows"]), hide_index=True, key="exp_results")
    st.subheader("Settings that differ")
    if table["differs"]:
        st.dataframe(experiments.differs_frame(table["differs"], [r.name for r in chosen]), key="exp_differs")
    else:
        st.caption("None: these runs share every setting." if len(chosen) > 1 else "Pick two runs or more.")

st.subheader("The queue")
rows = queue_table(state.runs_dir())
if not rows:
    st.caption("No run is waiting. On the Fine-tune page, Start on a busy device offers to queue the run.")
else:
    for key in sorted({row["device"] for row in rows}):
        ensure_runner(state.runs_dir(), key)  # a runner that died (a restart, a crash) is replaced
    st.dataframe(experiments.queue_frame(rows), hide_index=True, key="exp_queue")
    c = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    which = c[0].selectbox("Queued run", [row["run"] for row in rows], key="exp_queued")
    place = c[1].number_input("Move to place", 1, len(rows), 1, key="exp_place")
    try:
        if c[2].button("Move", key="exp_move"):
            move(loaders.open_run(which), place)
            st.rerun()
        if c[3].button("Remove from the queue", key="exp_dequeue"):
            dequeue(loaders.open_run(which))
            st.rerun()
    except RunError as exc:
        st.error(str(exc))
