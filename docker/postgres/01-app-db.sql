-- The compose file's stand-in for the main API's database.
CREATE DATABASE flux_app;
