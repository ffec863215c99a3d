"""convert stage of wina."""
