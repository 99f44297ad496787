"""Sample quality: FID / IS / KID and their feature extractors."""
