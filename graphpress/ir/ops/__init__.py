"""The graphpress op set: each compressed weight format is a ``torch.library.custom_op``.

One file per op (reference implementation, fake implementation, ONNX and TVM
lowerings, Triton kernel). The formats arrive with the passes that produce them;
``low_rank`` needs none (a factored linear is two linears).
"""
