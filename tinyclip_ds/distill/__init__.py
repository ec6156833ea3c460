"""Layer maps, loss terms and the stage objectives that combine them."""
