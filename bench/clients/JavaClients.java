// Keep-alive POSTs through an HTTP proxy with Java's two built-in clients, for bench/bench_clients.py.
//
//   java JavaClients.java httpclient|urlconnection PROXY_HOST PROXY_PORT URL JSON_BODY COUNT
//
// Prints one line per request: the milliseconds it took and its X-Cache header.
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.Proxy;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;

public class JavaClients {
    public static void main(String[] args) throws Exception {
        String mode = args[0];
        InetSocketAddress proxy = new InetSocketAddress(args[1], Integer.parseInt(args[2]));
        String url = args[3];
        byte[] body = args[4].getBytes(StandardCharsets.UTF_8);
        int count = Integer.parseInt(args[5]);
        if (mode.equals("httpclient")) {
            HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.of(proxy)).build();
            HttpRequest request = HttpRequest.newBuilder(URI.create(url))
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofByteArray(body))
                .build();
            for (int i = 0; i < count; i++) {
                long started = System.nanoTime();
                HttpResponse<byte[]> response = client.send(request, HttpResponse.BodyHandlers.ofByteArray());
                long took = System.nanoTime() - started;
                System.out.println(took / 1e6 + " " + response.headers().firstValue("x-cache").orElse("-"));
            }
        } else {
            Proxy through = new Proxy(Proxy.Type.HTTP, proxy);
            for (int i = 0; i < count; i++) {
                long started = System.nanoTime();
                HttpURLConnection connection = (HttpURLConnection) URI.create(url).toURL().openConnection(through);
                connection.setRequestMethod("POST");
                connection.setDoOutput(true);
                connection.setRequestProperty("Content-Type", "application/json");
                connection.setFixedLengthStreamingMode(body.length);
                try (OutputStream out = connection.getOutputStream()) {
                    out.write(body);
                }
                connection.getResponseCode();
                try (InputStream in = connection.getInputStream()) {
                    in.readAllBytes();  // read to the end, so the connection is kept alive for the next
                }
                long took = System.nanoTime() - started;
                String cache = connection.getHeaderField("X-Cache");
                System.out.println(took / 1e6 + " " + (cache == null ? "-" : cache));
            }
        }
    }
}
