package protocol

import (
	"encoding/json"
	"fmt"
	"strings"
)

// TensorSpec is one input or output of a signature: a name, a dtype and a
// shape in which -1 matches any size.
type TensorSpec struct {
	Name  string `json:"name"`
	DType DType  `json:"datatype"`
	Shape []int  `json:"shape"`
}

// Metadata is the METADATA reply (section 3.1): the Open Inference
// Protocol's model metadata plus max_batch_size. A model without a
// signature has no inputs and outputs.
type Metadata struct {
	Name     string       `json:"name"`
	Platform string       `json:"platform"`
	Versions []string     `json:"versions"`
	Inputs   []TensorSpec `json:"inputs"`
	Outputs  []TensorSpec `json:"outputs"`
	// MaxBatchSize > 0 makes dim 0 of every input and output the batch
	// dimension: a request carries 1..MaxBatchSize rows.
	MaxBatchSize int `json:"max_batch_size"`
}

// DecodeMetadata parses a METADATA reply. Members it does not know are
// ignored, as the spec asks; a signature a server could not hold (a rank
// over 8, a dim below -1, names that repeat, a batched signature whose dim
// 0 is not -1) is a protocol violation, so Bind can trust what it reads.
func DecodeMetadata(body []byte) (Metadata, error) {
	var m Metadata
	if err := json.Unmarshal(body, &m); err != nil {
		return Metadata{}, fmt.Errorf("%w: METADATA reply: %w", ErrProtocolViolation, err)
	}
	if err := m.check(); err != nil {
		return Metadata{}, fmt.Errorf("%w: METADATA reply: %w", ErrProtocolViolation, err)
	}
	return m, nil
}

func (m Metadata) check() error {
	if m.MaxBatchSize < 0 {
		return fmt.Errorf("max_batch_size %d", m.MaxBatchSize)
	}
	for _, group := range []struct {
		what  string
		specs []TensorSpec
	}{{"input", m.Inputs}, {"output", m.Outputs}} {
		if len(group.specs) > MaxTensors {
			return fmt.Errorf("%d %ss, at most %d", len(group.specs), group.what, MaxTensors)
		}
		seen := map[string]bool{}
		for _, spec := range group.specs {
			switch {
			case spec.Name == "" || len(spec.Name) > MaxNameLen:
				return fmt.Errorf("%s name %q: 1..%d bytes", group.what, spec.Name, MaxNameLen)
			case seen[spec.Name]:
				return fmt.Errorf("%s %q declared twice", group.what, spec.Name)
			case len(spec.Shape) > MaxRank:
				return fmt.Errorf("%s %q: rank %d is over %d", group.what, spec.Name, len(spec.Shape), MaxRank)
			case m.MaxBatchSize > 0 && (len(spec.Shape) == 0 || spec.Shape[0] != -1):
				return fmt.Errorf("%s %q: shape %v, but a batched signature has dim 0 = -1", group.what, spec.Name, spec.Shape)
			}
			seen[spec.Name] = true
			for _, d := range spec.Shape {
				if d < -1 || d > MaxDim {
					return fmt.Errorf("%s %q: dim %d in %v", group.what, spec.Name, d, spec.Shape)
				}
			}
		}
	}
	return nil
}

// Bind matches a request's tensors to m's inputs by the rules of section
// 3.1, errors 2-6 in the spec's order, and returns them in input order.
// The server applies the same rules (its decision is final); a client may
// call Bind to fail a request without a round trip.
func (m Metadata) Bind(tensors []Tensor) ([]Tensor, error) {
	if len(tensors) == 0 {
		return nil, newError(CodeBadTensor, "a request carries 1..%d tensors, not 0", MaxTensors)
	}
	if len(m.Inputs) == 0 {
		return nil, newError(CodeUnsupported, "model %q has no signature", m.Name)
	}
	named := 0
	for _, t := range tensors {
		if t.Name != "" {
			named++
		}
	}
	if named != 0 && named != len(tensors) {
		return nil, newError(CodeBadInput, "name every tensor or none (%d of %d are named)", named, len(tensors))
	}
	if len(tensors) > len(m.Inputs) {
		return nil, newError(CodeBadInput, "%d tensors, the model takes %d input(s): %s", len(tensors), len(m.Inputs), m.inputNames())
	}
	bound := make([]Tensor, len(m.Inputs))
	given := make([]bool, len(m.Inputs))
	for i, t := range tensors {
		at := i
		if named > 0 {
			at = m.inputIndex(t.Name)
			if at < 0 {
				return nil, newError(CodeBadInput, "no input named %q; the model takes %s", t.Name, m.inputNames())
			}
			if given[at] {
				return nil, newError(CodeBadInput, "input %q given twice", t.Name)
			}
		}
		bound[at], given[at] = t, true
	}
	for i, spec := range m.Inputs {
		if !given[i] {
			return nil, newError(CodeBadInput, "input %q is missing", spec.Name)
		}
	}
	for i, spec := range m.Inputs {
		if bound[i].DType != spec.DType {
			return nil, newError(CodeBadDType, "input %q: dtype %v, the signature says %v", spec.Name, bound[i].DType, spec.DType)
		}
	}
	batch := -1
	for i, spec := range m.Inputs {
		shape := bound[i].Shape
		if !shapeMatches(spec.Shape, shape) {
			return nil, newError(CodeBadShape, "input %q: shape %v, the signature says %v", spec.Name, shape, spec.Shape)
		}
		if m.MaxBatchSize == 0 {
			continue
		}
		if len(shape) == 0 {
			return nil, newError(CodeBadShape, "input %q: a scalar, but the model is batched", spec.Name)
		}
		if rows := shape[0]; rows < 1 || rows > m.MaxBatchSize {
			return nil, newError(CodeBadShape, "input %q: batch of %d, the model takes 1..%d", spec.Name, rows, m.MaxBatchSize)
		} else if batch >= 0 && rows != batch {
			return nil, newError(CodeBadShape, "input %q: batch of %d, other inputs have %d", spec.Name, rows, batch)
		}
		batch = shape[0]
	}
	return bound, nil
}

func shapeMatches(want, got []int) bool {
	if len(want) != len(got) {
		return false
	}
	for i, d := range want {
		if d != -1 && d != got[i] {
			return false
		}
	}
	return true
}

func (m Metadata) inputIndex(name string) int {
	for i, spec := range m.Inputs {
		if spec.Name == name {
			return i
		}
	}
	return -1
}

func (m Metadata) inputNames() string {
	names := make([]string, len(m.Inputs))
	for i, spec := range m.Inputs {
		names[i] = spec.Name
	}
	return strings.Join(names, ", ")
}
