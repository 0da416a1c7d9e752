"""tcptrace: trace TCP socket lifecycles from the kernel with eBPF."""

__version__ = "0.1.0"
