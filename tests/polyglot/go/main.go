// A Go client of the gateway's gRPC API, built from stubs that `make go-client`
// generates from protos/ alone (Debian's protoc-gen-go and protoc-gen-go-grpc, GOPATH
// mode, no module downloads): it shows that a Go program can use the contract, and
// lets tests/test_polyglot.py check that against the real server.
//
// Usage:
//
//	hubclient -addr 127.0.0.1:50051 -token T [-model openai/gpt-4o-mini] [-error-model openai/error-429]
//
// It calls StatusService.GetStatus, ChatService.CreateChatCompletion,
// ChatService.StreamChatCompletion and then CreateChatCompletion with -error-model,
// which must fail, and prints one JSON object on stdout:
//
//	{"status": {"available"}, "chat": {"content", "finish_reason", "model"},
//	 "stream": {"content", "chunks", "finish_reason"},
//	 "error": {"code", "message", "reason", "domain", "metadata", "retry_delay_ms"}}
//
// Any other failure is printed as {"failure": "..."} with exit status 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	hubv1 "github.com/aigne/hub/gen/go/aigne/hub/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

type report struct {
	Status map[string]interface{} `json:"status"`
	Chat   map[string]interface{} `json:"chat"`
	Stream map[string]interface{} `json:"stream"`
	Error  map[string]interface{} `json:"error"`
}

func main() {
	addr := flag.String("addr", "", "the gateway's gRPC address, host:port")
	token := flag.String("token", "", "an API key, sent as a bearer token")
	model := flag.String("model", "openai/gpt-4o-mini", "the model to chat with")
	errorModel := flag.String("error-model", "openai/error-429", "a model whose call must fail")
	text := flag.String("text", "hello from go", "the user message")
	flag.Parse()
	out, err := run(*addr, *token, *model, *errorModel, *text)
	if err != nil {
		emit(map[string]string{"failure": err.Error()})
		os.Exit(1)
	}
	emit(out)
}

func emit(value interface{}) {
	encoded, _ := json.Marshal(value)
	fmt.Println(string(encoded))
}

func run(addr, token, model, errorModel, text string) (*report, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer conn.Close()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	out := &report{}

	state, err := hubv1.NewStatusServiceClient(conn).GetStatus(ctx, &hubv1.GetStatusRequest{})
	if err != nil {
		return nil, fmt.Errorf("GetStatus: %w", err)
	}
	out.Status = map[string]interface{}{"available": state.GetAvailable()}

	chat := hubv1.NewChatServiceClient(conn)
	answer, err := chat.CreateChatCompletion(ctx, request(model, text))
	if err != nil {
		return nil, fmt.Errorf("CreateChatCompletion: %w", err)
	}
	choice := answer.GetChoices()[0]
	out.Chat = map[string]interface{}{
		"content":       choice.GetMessage().GetContent(),
		"finish_reason": choice.GetFinishReason(),
		"model":         answer.GetModel(),
	}

	if out.Stream, err = stream(ctx, chat, request(model, text)); err != nil {
		return nil, err
	}

	_, err = chat.CreateChatCompletion(ctx, request(errorModel, text))
	if err == nil {
		return nil, fmt.Errorf("CreateChatCompletion with %s did not fail", errorModel)
	}
	out.Error = describe(err)
	return out, nil
}

func request(model, text string) *hubv1.CreateChatCompletionRequest {
	return &hubv1.CreateChatCompletionRequest{
		Model:    model,
		Messages: []*hubv1.ChatMessage{{Role: "user", Content: structpb.NewStringValue(text)}},
	}
}

func stream(ctx context.Context, chat hubv1.ChatServiceClient, req *hubv1.CreateChatCompletionRequest) (map[string]interface{}, error) {
	chunks, err := chat.StreamChatCompletion(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("StreamChatCompletion: %w", err)
	}
	var content strings.Builder
	count, finish := 0, ""
	for {
		chunk, err := chunks.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("StreamChatCompletion: %w", err)
		}
		count++
		for _, choice := range chunk.GetChoices() {
			content.WriteString(choice.GetDelta().GetContent())
			if choice.FinishReason != nil {
				finish = choice.GetFinishReason()
			}
		}
	}
	return map[string]interface{}{"content": content.String(), "chunks": count, "finish_reason": finish}, nil
}

// describe reads a failed call's rich status: its code and message, and the
// google.rpc.ErrorInfo and RetryInfo details the gateway attaches.
func describe(err error) map[string]interface{} {
	st := status.Convert(err)
	found := map[string]interface{}{"code": int(st.Code()), "message": st.Message()}
	for _, detail := range st.Details() {
		switch info := detail.(type) {
		case *errdetails.ErrorInfo:
			found["reason"] = info.GetReason()
			found["domain"] = info.GetDomain()
			found["metadata"] = info.GetMetadata()
		case *errdetails.RetryInfo:
			found["retry_delay_ms"] = info.GetRetryDelay().AsDuration().Milliseconds()
		}
	}
	return found
}
