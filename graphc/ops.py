"""graphc's custom operators (torch.library, namespace `graphc::`); importing this
module registers them all, so graphs holding them run, export and print.

    ops_quant: fake_quant_per_tensor, fake_quant_per_channel, fake_quant_dynamic
    ops_qint:  quantize, quantize_dynamic, qlinear, qconv2d, qembedding (integer kernels)
    ops_codebook: codebook_decode, codebook_linear, codebook_embedding (share-weights)
    ops_sparse: bsr_linear, sparse_decode (sparsify)
"""

from graphc import ops_codebook, ops_qint, ops_quant, ops_sparse  # noqa: F401  (registers the ops)
