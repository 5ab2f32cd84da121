"""Experiments: runs compared (curves overlaid, only the settings that differ, each run's figures), the chapter's
exercises as one experiment beside the book's figures, the queue."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from sft.studio.config import ConfigError
from sft.studio.exercises import (BOOK_SETUP, experiment_busy, list_experiments, lora_text, markdown_table,
                                  start_chapter_exercises, start_scoring_jobs, summarize_experiment)
from sft.studio.experiments import X_AXES, compare_runs
from sft.studio.queue import dequeue, ensure_runner, move, queue_table
from sft.studio.runs import RunError
from ui import experiments, loaders, snippets, state, widgets

state.init_state()
ss = st.session_state
st.title("Experiments")
st.caption("Runs side by side: their loss curves overlaid, the settings that differ between them, and what each "
           "achieved. Runs of different sizes or data can be compared; the table says what differs.")

runs = [r for r in loaders.list_runs() if not r.is_broken]
names = [r.name for r in runs]
if not runs:
    st.info("No runs yet: fine-tune one on the Fine-tune page, or queue the chapter's exercises below.")
else:
    state.start_widget("exp_runs", [n for n in ss.get("exp_selected", names[:3]) if n in names] or names[:3])
    ss.exp_selected = st.multiselect("Runs", names, key="exp_runs")
by_name = {r.name: r for r in runs}
chosen = [by_name[n] for n in ss.get("exp_selected") or [] if n in by_name]  # in the order picked
if runs and chosen:
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
    widgets.code_behind(snippets.experiments([r.path for r in chosen]))

st.subheader("The chapter's exercises")
st.caption("One click queues the chapter's variants on the same data, model and seed: the baseline, the Phi-3 prompt "
           "style (exercise 7.1), instruction masking (7.2), LoRA with rank 16 and alpha 16 (7.4), then DPO on top "
           "of the baseline (from its final weights, the DPO notebook's settings). Each answers its test split after training, the judge scores the "
           "answers, and the table sets them beside the book's published figures.")
root, judge = state.runs_dir(), experiments.workspace_judge(ss)
c = st.columns([1, 1, 1, 1.3], vertical_alignment="bottom")  # the button's label whole at 1280 px
limit = c[0].number_input("Use the first N entries (0 = all)", 0, None, 0, key="exp_ex_limit")
seed = c[1].number_input("Seed", 0, None, 123, key="exp_ex_seed")
steps = c[2].number_input("Stop after N steps (0 = no limit)", 0, None, 0, key="exp_ex_steps")
if c[3].button("Queue the chapter's exercises", type="primary", key="exp_ex_start"):
    try:
        made = start_chapter_exercises(root, experiments.exercise_settings(ss, limit, seed, steps),
                                       judge=judge)  # kept in the record for `python -m sft experiment summary`
    except (ConfigError, RunError, ValueError) as exc:
        st.error(f"Not queued: {exc}", icon=":material/block:")
    else:
        ss.exp_ex_name = made["name"]
        st.rerun()
st.caption(f"Model `{ss.model_name}` (Fine-tune page), data {ss.dataset_name} (Data page), allowed_max_length "
           f"{ss.allowed_max_length} (Batches page); the judge: `{judge['model']}` at {judge['url']} (Judge page).")
notice = ss.pop("exp_ex_notice", None)
if notice:
    st.info(notice, icon=":material/grading:")
found = list_experiments(root)
if found:
    state.start_widget("exp_ex_name", found[0], found)
    shown = st.selectbox("Experiment", found, key="exp_ex_name")
    busy = experiment_busy(root, shown)

    @st.fragment(run_every=2.0 if busy else None)
    def exercise_table(name):
        """The runs beside the book's figures, read again every 2 s while one waits, trains or is scored."""
        summary = summarize_experiment(root, name, score=False, write=False)
        if busy and not experiment_busy(root, name):
            st.rerun()  # all ended: the page once more, polling off
        (st.success if summary["comparable"] else st.warning)(summary["note"][:1].upper() + summary["note"][1:] + ".")
        st.dataframe(experiments.exercises_frame(summary), hide_index=True, key="exp_ex_table")
        st.caption(f"{lora_text(summary)} The book's columns: {BOOK_SETUP}.")
        st.download_button("Download the table (Markdown)", markdown_table(summary), f"{name}.md", key="exp_ex_md")

    exercise_table(shown)
    if st.button("Score the answers with the judge", key="exp_ex_score", help="Background jobs, one per completed "
                 "run whose answers are not all scored yet, with the judge chosen on the Judge page."):
        try:
            jobs = start_scoring_jobs(root, shown, judge)
        except (RunError, ValueError, OSError) as exc:
            st.error(f"Not scored: {exc}", icon=":material/block:")
        else:
            ss.exp_ex_notice = (f"Scoring the answers of {', '.join(jobs)} in the background: the table shows the "
                                "means as they come." if jobs else "Nothing to score: the answers of every "
                                "completed run are scored already.")
            st.rerun()

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
