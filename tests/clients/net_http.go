// Go's net/http, unchanged: GET of one Publer URL (os.Args[1]) with the key from
// PUBLER_API_KEY. The default transport reads HTTPS_PROXY; SSL_CERT_FILE is the trust store.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	request, err := http.NewRequest("GET", os.Args[1], nil)
	if err != nil {
		panic(err)
	}
	request.Header.Set("Authorization", "Bearer-API "+os.Getenv("PUBLER_API_KEY"))
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer response.Body.Close()
	body, _ := io.ReadAll(response.Body)
	out, _ := json.Marshal(map[string]any{"status": response.StatusCode, "body": string(body)})
	fmt.Println(string(out))
}
