"""megatron-core version differences (tested range: 0.16.1 to 0.19.x), in one place.

No other module checks megatron-core's version. Each branch below names the release and the
upstream change. Where a newer release has a public hook, it is used there; the private path
remains only for the releases that lack the hook.

Checked against the installed sources of 0.16.1 and 0.19.2 (also: docs/design.md, "megatron-core
versions"):

* 0.18 added ``output_processor`` to ``GPTModel.forward`` (public) and ``padding_mask`` to the
  private ``GPTModel._postprocess``: :class:`LabelledOutputGPTModel` uses the hook from 0.18 on.
* 0.18 removed ``megatron.core.utils.get_thd_batch_on_this_cp_rank``: not used here (our packer
  cuts THD batches per CP rank itself, ``data/packing.py``).
* 0.19 deprecates ``GPTModel`` in favour of ``HybridModel`` (a warning at construction; GPTModel
  still receives bug fixes). 0.16.1 has no ``HybridModel``, so we stay on ``GPTModel`` and show
  the deprecation warning once per process, not once per model chunk.
* 0.19 removed ``dist_checkpointing/strategies/base.py`` and other deprecated modules: we use
  only ``dist_checkpointing.save/load`` and ``mapping.ShardedObject``, present in both.
* 0.19's DDP calls ``torch.cuda.current_stream()`` in ``start_grad_sync``: a CPU matter, patched
  with the other CPU patches in :mod:`solopo_mcore.platform` (harmless on 0.16.1).
* 0.17+ require Python >= 3.12, so Python 3.11 installs get 0.16.1 (``setup.py`` allows
  ``>=0.16.1,<0.20``).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging

from megatron.core.models.gpt import GPTModel

#: The installed release, from the package metadata. (``megatron.core.__version__`` from 0.19 on
#: appends the short git hash of whatever repository the package sits in, e.g. ours when the
#: virtual environment is inside the checkout.)
MEGATRON_CORE_VERSION: str = importlib.metadata.version("megatron-core")

#: megatron-core >= 0.18: ``GPTModel.forward(..., output_processor=...)`` exists.
GPT_HAS_OUTPUT_PROCESSOR: bool = "output_processor" in inspect.signature(GPTModel.forward).parameters

_LABELS_POSITION = 4  # GPTModel.forward(input_ids, position_ids, attention_mask, decoder_input, labels


class _OnceFilter(logging.Filter):
    """Lets a given message through once per process."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


# megatron-core 0.19 ``models/gpt/gpt_model.py``: every GPTModel construction logs "GPTModel IS
# DEPRECATED" (one per virtual-pipeline chunk, per rank, per rebuild). Show it once.
logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(
    _OnceFilter("GPTModel IS DEPRECATED"))


class LabelledOutputGPTModel(GPTModel):
    """``GPTModel`` whose last pipeline stage, when ``labels`` are given, hands the decoder's final
    hidden states to :meth:`labelled_output` instead of running the output layer and loss.

    Subclasses implement ``labelled_output(hidden_states, labels, loss_mask, output_weight)``;
    ``output_weight`` is the shared embedding with tied embeddings, else None. Without labels
    the model behaves as ``GPTModel`` (full logits)."""

    def labelled_output(self, hidden_states, labels, loss_mask, output_weight):
        raise NotImplementedError

    if GPT_HAS_OUTPUT_PROCESSOR:
        # megatron-core >= 0.18: ``GPTModel.forward`` takes ``output_processor``, which
        # ``_postprocess`` calls on the last stage (after MTP) in place of the output layer and
        # loss, with ``hidden_states``, ``output_weight``, ``labels`` and ``loss_mask`` as keywords.
        def forward(self, *args, **kwargs):
            labels = args[_LABELS_POSITION] if len(args) > _LABELS_POSITION \
                else kwargs.get("labels")
            if labels is not None and kwargs.get("output_processor") is None:
                kwargs["output_processor"] = self._labelled_output_processor
            return super().forward(*args, **kwargs)

        def _labelled_output_processor(self, *, hidden_states, output_weight, labels, loss_mask,
                                       **_):
            return self.labelled_output(hidden_states, labels, loss_mask, output_weight)
    else:
        # megatron-core 0.16 / 0.17: no hook. Override the private ``_postprocess``, which
        # ``GPTModel.forward`` calls with keyword arguments only and which returns the decoder
        # output unchanged on non-last stages (MTP, unused here, would run before this point).
        def _postprocess(self, hidden_states, *args, labels=None, loss_mask=None, **kwargs):
            if not self.post_process or labels is None:
                return super()._postprocess(hidden_states, *args, labels=labels,
                                            loss_mask=loss_mask, **kwargs)
            weight = self.shared_embedding_or_output_weight() \
                if self.share_embeddings_and_output_weights else None
            return self.labelled_output(hidden_states, labels, loss_mask, weight)
