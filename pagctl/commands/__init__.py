"""The ``pagctl`` commands, one module per group; ``pagctl.cli`` registers them on its
app in the order ``pagctl --help`` lists them."""
