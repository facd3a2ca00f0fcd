//! `sppo run`: the SPPO loop (sample → rank → reference log-probs → train → save → evaluate) over
//! N iterations, with a run directory, a manifest of completed work and resume.

pub mod config;
pub mod manifest;
