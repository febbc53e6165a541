"""What the tools (tomesd.bench, tomesd.quality, tomesd.info, tomesd.visualize's recorder users, examples/)
share, and the library never imports: the one model loader (`models`), the built-in architectures with
random weights (`archs`), argument types, the settings grid, formatting and environment (`cli`),
timing windows, OOM and RSS, isolation (`timing`), torch threads from the free cores (`threads`),
several processes where `accelerate launch` starts one (`launch`), and diffusers' warning filters (`quiet`)."""
