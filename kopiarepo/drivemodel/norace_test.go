//go:build !race

package drivemodel_test

const raceEnabled = false
