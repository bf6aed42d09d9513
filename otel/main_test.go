package resilientotel_test

import (
	"testing"

	"github.com/resilientpg/resilientpg/internal/killtest"
)

func TestMain(m *testing.M) { killtest.Main(m) }
