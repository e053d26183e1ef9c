"""PPAV, IC-MoE's pixel-probability adaptive voting, in every form the toolkit runs it.

    reference.py   the PyTorch reference (`ppav`): the definition every other form matches
    kernel.py      the same as one fused Triton kernel (eager GPU inference, the TensorRT plugin)
    op.py          `torch.ops.icmoe.ppav`: the kernel on CUDA tensors, the reference on CPU tensors
    plugin.py      the kernel as a TensorRT AOT plugin, and the ONNX graph pass that uses it

Only the reference is imported here; the others pull in Triton, TensorRT or
onnx-graphsurgeon and are imported where they are used.
"""

from icmoe.families.icmoe.voting.reference import NUM_CANDIDATES, Vote, candidate_distances, choose_candidates, ppav

__all__ = ["NUM_CANDIDATES", "Vote", "candidate_distances", "choose_candidates", "ppav"]
