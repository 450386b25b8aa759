"""The subcommands of `evalprov`, one module each. Every module exports `COMMAND` (a
`common.Command`: name, help, examples, arguments, run); `evalprov.cli` builds the parser
from them, all the same way."""
