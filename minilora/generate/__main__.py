"""python -m minilora.generate: the command line of minilora.generate (a package, so that running it
with -m does not load the module twice, as it would for a submodule the package itself imports)."""

from minilora.generate import main

main()
