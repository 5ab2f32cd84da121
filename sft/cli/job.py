"""``python -m sft job --dir FOLDER``: do the background job in FOLDER (``sft.studio.jobs``).

The app starts this command detached (``start_job``); it reads job.json, runs the job's kind,
keeps status.json current and exits 0 when the job completed or stopped, 1 when it failed.
"""


def add_arguments(parser):
    parser.add_argument("--dir", required=True, metavar="FOLDER",
                        help="the job's folder (job.json says what to do; status.json says how far it is)")


def run(args):
    from ..studio import exports  # noqa: F401  registers the "export" kind (jobs.py has the others)
    from ..studio.jobs import run_job

    status = run_job(args.dir)
    print(f"job {status.get('state')}: {status.get('done')} of {status.get('total')}"
          + (f"; {status['error']}" if status.get("error") else ""))
    return 1 if status.get("state") == "failed" else 0
