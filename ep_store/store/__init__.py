"""The store: the only code that imports lance and knows file names and which versions form a snapshot."""
