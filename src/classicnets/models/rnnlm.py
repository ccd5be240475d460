"""Word-level recurrent language models: embedding -> LSTM or vanilla RNN -> softmax.

The model of Zaremba, Sutskever & Vinyals 2014 ("Recurrent Neural Network Regularization") and
of the TensorFlow PTB tutorial, on PyTorch's fused recurrent kernels (``nn.LSTM`` / ``nn.RNN``,
cuDNN on a GPU):

    tokens [B, T] -> embedding [B, T, H] -> dropout -> layer 1 -> dropout -> ... -> layer L
                  -> dropout -> linear [B, T, V] (logits of the next token)

Dropout is applied only to the non-recurrent connections (Zaremba et al. 2014, Sec. 3): on the
embedded input, between layers (``nn.LSTM``'s own ``dropout`` argument) and on the output of the
last layer; the hidden state carried from one time step to the next is never dropped.

Every parameter (embedding, recurrent weights and biases, output layer) starts uniform in
``[-init_scale, init_scale]``, as both Zaremba's Lua code and the TF tutorial initialize all
variables. (PyTorch's LSTM has two bias vectors per gate where TF has one, so the summed bias is
not uniform but the sum of two; with ``init_scale <= 0.1`` the difference does not matter.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.models.registry import register_presets

__all__ = ["CELLS", "Hidden", "RNNLanguageModel", "detach_hidden", "generate"]

CELLS = ("lstm", "rnn_tanh", "rnn_relu")

# The recurrent state: (h, c) for an LSTM, h for a vanilla RNN; each [num_layers, B, hidden].
Hidden = Tensor | tuple[Tensor, Tensor]


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph behind ``hidden`` (truncated back-propagation between windows).

    pytorch/examples calls this ``repackage_hidden``; the values are kept, only the history
    of how they were computed is dropped.
    """
    if isinstance(hidden, Tensor):
        return hidden.detach()
    return tuple(h.detach() for h in hidden)


class RNNLanguageModel(nn.Module):
    """Embedding, a stack of recurrent layers and a softmax output over the vocabulary.

    Args:
        vocab_size: number of word types ``V`` (10,000 for PTB).
        hidden_size: units per recurrent layer; also the embedding size (as in Zaremba et al.).
        num_layers: stacked recurrent layers.
        cell: "lstm", "rnn_tanh" or "rnn_relu" (Elman RNN with that nonlinearity).
        dropout: probability of dropping each non-recurrent connection (0 = none).
        tie_weights: share the input embedding and the output layer's weight matrix (Press &
            Wolf 2017; Inan et al. 2017); needs the embedding size equal to ``hidden_size``.
        init_scale: every parameter starts uniform in ``[-init_scale, init_scale]``.
        embedding_size: size of the word vectors (default ``hidden_size``).

    >>> model = RNNLanguageModel(vocab_size=50, hidden_size=8, num_layers=2)
    >>> logits, hidden = model(torch.zeros(3, 5, dtype=torch.long))
    >>> logits.shape, hidden[0].shape
    (torch.Size([3, 5, 50]), torch.Size([2, 3, 8]))
    """

    def __init__(
        self,
        vocab_size: int = 10_000,
        hidden_size: int = 200,
        num_layers: int = 2,
        cell: str = "lstm",
        dropout: float = 0.0,
        tie_weights: bool = False,
        init_scale: float = 0.1,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("cell", cell, CELLS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_layers < 1 or hidden_size < 1 or vocab_size < 1:
            raise ValueError("vocab_size, hidden_size and num_layers must be >= 1")
        embedding_size = hidden_size if embedding_size is None else embedding_size
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(
                f"tie_weights needs embedding_size == hidden_size, got {embedding_size} and "
                f"{hidden_size}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.cell = cell
        self.tie_weights = tie_weights
        self.init_scale = init_scale

        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        between = dropout if num_layers > 1 else 0.0  # torch warns on dropout with one layer
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(
                embedding_size, hidden_size, num_layers, dropout=between, batch_first=True
            )
        else:
            self.rnn = nn.RNN(
                embedding_size,
                hidden_size,
                num_layers,
                nonlinearity=cell.removeprefix("rnn_"),
                dropout=between,
                batch_first=True,
            )
        self.decoder = nn.Linear(hidden_size, vocab_size)
        self.reset_parameters()
        if tie_weights:
            self.decoder.weight = self.embedding.weight  # one [V, H] matrix, two uses

    def reset_parameters(self) -> None:
        """Every parameter uniform in ``[-init_scale, init_scale]`` (Zaremba et al. 2014)."""
        for p in self.parameters():
            nn.init.uniform_(p, -self.init_scale, self.init_scale)

    def init_hidden(self, batch_size: int) -> Hidden:
        """The zero state for ``batch_size`` rows, on the parameters' device and dtype."""
        w = self.decoder.weight
        shape = (self.num_layers, batch_size, self.hidden_size)  # [L, B, H]
        h = torch.zeros(shape, dtype=w.dtype, device=w.device)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h

    def forward(self, tokens: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """Logits of the next token at every position, and the final recurrent state.

        Args:
            tokens: ``[B, T]`` int64 word ids.
            hidden: the state after the previous window (``init_hidden``'s zeros if None).

        Returns:
            ``(logits [B, T, V], hidden)``; ``hidden`` keeps its graph (detach it between
            windows with ``detach_hidden``).
        """
        if hidden is None:
            hidden = self.init_hidden(tokens.shape[0])
        x = self.dropout(self.embedding(tokens))  # [B, T, E]
        output, hidden = self.rnn(x, hidden)  # [B, T, H]
        logits = self.decoder(self.dropout(output))  # [B, T, V]
        return logits, hidden


@torch.no_grad()
def generate(
    model: RNNLanguageModel,
    context: list[int],
    num_tokens: int,
    end_token: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Token ids sampled from ``model`` after it has read ``context`` (at least one id).

    Each next token is drawn from ``softmax(logits / temperature)`` (float64, on the CPU, with
    its own generator seeded ``seed``). ``end_token`` (``<eos>``: it ends sentences) is kept in
    the output but not counted towards ``num_tokens``; a model that only ends sentences still
    stops after ``20 * num_tokens + 100`` draws. The model is left in eval mode.

    Args:
        temperature: > 0; below 1 sharpens the distribution, above 1 flattens it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    logits, hidden = model(torch.tensor([context], device=device))  # [1, T, V]
    out: list[int] = []
    counted = 0
    while counted < num_tokens and len(out) < 20 * num_tokens + 100:
        probs = torch.softmax(logits[0, -1].double().cpu() / temperature, dim=-1)  # [V]
        out.append(int(torch.multinomial(probs, 1, generator=generator)))
        counted += out[-1] != end_token
        logits, hidden = model(torch.tensor([[out[-1]]], device=device), hidden)
    return out


_TINY = {"vocab_size": 10, "hidden_size": 8, "num_layers": 2, "dropout": 0.1}


register_presets(
    RNNLanguageModel,
    {
        "rnnlm-lstm": ("word-level LSTM language model (Zaremba et al. 2014)", {"cell": "lstm"}),
        "rnnlm-rnn-tanh": ("word-level vanilla RNN language model, tanh", {"cell": "rnn_tanh"}),
        "rnnlm-rnn-relu": ("word-level vanilla RNN language model, ReLU", {"cell": "rnn_relu"}),
    },
    example_input_shape=(4, 6),
    input_dtype="long",
    test_kwargs=_TINY,
)
