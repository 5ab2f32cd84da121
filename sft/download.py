"""Downloads with a progress bar, resume and checks, for GPT-2's weight files.

``download_file`` streams one URL to disk through a ``.part`` file: it resumes that file with an
HTTP Range request, checks the size against the server's and the sha256 where known, and only then
renames it, so a file that exists is complete. ``download_all`` fetches a list of files, trying each
file's URLs in order (a mirror after the main host), and fails with one message naming every URL
tried and the folder to fill by hand, which is what a person on an offline machine needs.
"""
import hashlib
import os
import re

import requests
from tqdm import tqdm

TIMEOUT = (5, 60)  # (connect, read) seconds: offline fails at once, a slow mirror still finishes


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and the folder to fill by hand."""


# ----------------------------------------------------------------------------- downloads

def _linked_sha256(response):
    # Not in the book: Hugging Face sends an LFS file's sha256 as X-Linked-Etag on the redirect.
    for r in (*response.history, response):
        tag = r.headers.get("X-Linked-Etag", "").strip().strip('"').removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def download_file(url, destination, *, progress=None, sha256=None, show_bar=True, timeout=TIMEOUT,
                  chunk_size=1 << 20):
    """Stream ``url`` to ``destination`` (chapter 5), resuming ``destination + '.part'``.

    A complete file is skipped without touching the network. ``progress(done_bytes, total_bytes,
    filename)`` is called as bytes arrive (total_bytes is None if the server does not say).
    The size is checked against the server's, and the sha256 where known; only then is the
    ``.part`` renamed, so ``destination`` existing means complete.
    """
    name = os.path.basename(destination)
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    if os.path.exists(destination):
        if show_bar:
            tqdm.write(f"File already exists and is up-to-date: {destination}")
        return destination
    part = destination + ".part"
    for attempt in range(2):
        start = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"Accept-Encoding": "identity"}  # byte counts must match Content-Length
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = requests.get(url, stream=True, timeout=timeout, headers=headers)
        except requests.RequestException as e:
            raise DownloadError(f"{url}: {type(e).__name__}: {e}") from e
        with response:
            if response.status_code == 416 and attempt == 0:  # .part is not a prefix: start over
                os.remove(part)
                continue
            if response.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
            total = _expected_total(response, start)
            if response.status_code == 200:
                start = 0  # the server ignored Range: rewrite from the beginning
            expected_sha = sha256 or _linked_sha256(response)
            _stream(response, part, start, total, name, progress, show_bar, chunk_size, url)
        break
    size = os.path.getsize(part)
    if total is not None and size != total:
        if size > total:
            os.remove(part)
        raise DownloadError(f"{url}: size check failed, expected {total} bytes, got {size}; "
                            f"rerun to resume ({part})")
    if expected_sha:
        digest = _file_sha256(part)
        if digest != expected_sha.lower():
            os.remove(part)
            raise DownloadError(f"{url}: sha256 mismatch, expected {expected_sha}, got {digest}")
    os.replace(part, destination)
    return destination


def _expected_total(response, start):
    if response.status_code == 206:  # "Content-Range: bytes <start>-<end>/<total>"
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != start:
            raise DownloadError(f"{response.url}: bad Content-Range for resume: "
                                f"{response.headers.get('Content-Range')!r}")
        return None if m.group(2) == "*" else int(m.group(2))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _stream(response, part, start, total, name, progress, show_bar, chunk_size, url):
    done = start
    if progress:
        progress(done, total, name)
    bar = tqdm(total=total, initial=start, unit="iB", unit_scale=True, desc=name, disable=not show_bar)
    try:
        with bar, open(part, "ab" if start else "wb") as f:
            for chunk in response.iter_content(chunk_size):
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
                if progress:
                    progress(done, total, name)
    except requests.RequestException as e:  # includes a body cut short of its Content-Length
        raise DownloadError(f"{url}: connection lost after {done} of {total} bytes "
                            f"({type(e).__name__}); rerun to resume ({part})") from e


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_all(filenames, urls_for, folder, label, **kwargs):
    """Fetch each file into ``folder``, trying its URLs in order; one clear error if all fail."""
    os.makedirs(folder, exist_ok=True)
    for filename in filenames:
        errors = []
        for url in urls_for(filename):
            try:
                download_file(url, os.path.join(folder, filename), **kwargs)
                break
            except DownloadError as e:
                errors.append(str(e))
        else:
            raise DownloadError(
                f"Could not download {filename} for {label}:\n  " + "\n  ".join(errors)
                + f"\nIf this machine is offline, fetch these files elsewhere and put them in "
                f"{os.path.abspath(folder)}: {', '.join(filenames)}")
