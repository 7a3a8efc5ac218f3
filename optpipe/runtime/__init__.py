"""What runs a program: training (`training`), data reading, tokenizers and masking (`data`),
generation (`generation`), model- and data-parallel runs (`parallel`), and the one torchrun
launcher their ranks share.

The runtime builds on the core (`optpipe.program`, `optpipe.kv_step`, `optpipe.losses`, ...);
nothing in the core, the passes or the targets imports it. The package facade (`optpipe.train`,
`optpipe.generate`) and the CLI reach it on call.
"""
