mod audit;
mod identity;
mod powercut;
