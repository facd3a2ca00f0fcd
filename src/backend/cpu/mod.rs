//! The f32 CPU reference backend (to be implemented).
