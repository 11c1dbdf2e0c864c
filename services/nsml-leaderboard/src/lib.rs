//! nsml-leaderboard
