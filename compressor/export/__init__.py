"""Export: a trained or pruned PyTorch model as a MODEL_DIR the edge runtime reads.

``model_dir`` writes the folder (torch → ONNX → sparse/CSR weights → checked with onnxruntime),
``from_run`` picks a level of a RUN_DIR and exports it, ``onnx_graph`` cleans the exported graph (BatchNorm
folded, readable names), ``onnx_sparse``/``onnx_npz`` encode CSR and the uncompressed npz, ``quantize``
adds the int8 variant, ``compact`` rewrites the folder as format 3. The format itself is owned by
``edge_runtime.model_format`` (export writes exactly what the runtime reads). It may import every other
room of compressor and ``edge_runtime``; nothing in compressor imports it but the CLI and pipeline front.
"""
