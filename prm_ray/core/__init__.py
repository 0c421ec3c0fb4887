"""The paper's math, pure PyTorch and Python, no Ray: implicit and step rewards (``reward``), the
training objectives (``losses``, ``objectives``), the lr schedule, best-of-N and voting metrics
(``metrics``) and FLOP estimates (``flops``)."""
