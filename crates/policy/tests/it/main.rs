mod audit;
mod powercut;
