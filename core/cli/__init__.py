"""The command lines: parsers, one-line errors, what each entry point does, the generated flags page."""
