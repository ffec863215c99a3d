"""runtime stage of wina."""
