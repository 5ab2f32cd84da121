"""Training: the chapter's loss functions and loop (chapter 5, reused in chapter 7).

``calc_loss_batch``, ``calc_loss_loader``, ``evaluate_model``, ``generate_and_print_sample``,
``train_model_simple`` and ``plot_losses`` (drawn with Plotly here), with the book's signatures.

Not in the book: the resumable ``Trainer`` that the app, the command line and the benchmark
drive is ``sft.studio.trainer.Trainer``; with ``TrainConfig.chapter_path()`` it computes exactly
what ``train_model_simple`` computes (a test proves it).
"""
import os

import torch

from .batching import IGNORE_INDEX


# ============================================================================ Chapter 5

def calc_loss_batch(input_batch, target_batch, model, device, *, ignore_index=IGNORE_INDEX):
    """Mean cross-entropy of one batch: inputs/targets (B, T) -> scalar tensor."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, vocab)
    # flatten to (B*T, vocab) and (B*T,): cross_entropy wants one row per prediction
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target_batch.flatten(), ignore_index=ignore_index
    )


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average ``calc_loss_batch`` over the first ``num_batches`` batches (all if None); nan if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """(train_loss, val_loss) over ``eval_iter`` batches each, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    """Greedily continue ``start_context`` by 50 tokens and print it on one line."""
    from .generation import generate_text_simple
    from .tokenizer import text_to_token_ids, token_ids_to_text

    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)  # (1, n)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50,
                                         context_size=context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))  # compact: one line
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    """The chapter's loop; returns (train_losses, val_losses, track_tokens_seen), one per evaluation."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # gradients from the previous batch must not add up
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def _as_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, *, path=None):
    """The chapter's figure with Plotly: losses against epochs, tokens seen on a top axis.

    Returns the ``plotly`` Figure. Not in the book: ``path`` writes it (.html, or .png/.pdf
    where kaleido is installed); nothing is shown.
    """
    import plotly.graph_objects as go

    epochs, tokens = _as_list(epochs_seen), _as_list(tokens_seen)
    train, val = _as_list(train_losses), _as_list(val_losses)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=epochs, y=train, mode="lines", name="Training loss"))
    fig.add_trace(go.Scatter(x=epochs, y=val, mode="lines", name="Validation loss",
                             line={"dash": "dashdot"}))
    # An invisible copy against tokens seen, only to lay out the second x axis (as the book's twiny).
    fig.add_trace(go.Scatter(x=tokens, y=train, xaxis="x2", mode="lines", opacity=0,
                             showlegend=False, hoverinfo="skip", name="Tokens seen"))
    fig.update_layout(
        xaxis={"title": {"text": "Epochs"}},
        xaxis2={"title": {"text": "Tokens seen"}, "overlaying": "x", "side": "top"},
        yaxis={"title": {"text": "Loss"}},
        legend={"x": 1, "y": 1, "xanchor": "right"},
        width=500, height=300, margin={"l": 50, "r": 20, "t": 50, "b": 40},
    )
    if path is not None:
        path = os.fspath(path)
        if path.endswith(".html"):
            fig.write_html(path)
        else:
            try:
                fig.write_image(path)
            except (ImportError, ValueError) as exc:
                raise RuntimeError(f"cannot write {path}: static images need the 'kaleido' package; "
                                   "save as .html instead") from exc
    return fig
