package main

import "github.com/spf13/cobra"

// addCommands adds the subcommands beyond version to root.
func addCommands(root *cobra.Command) {}
